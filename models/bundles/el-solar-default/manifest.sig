{
  "key_id": "hq",
  "signature": "yos1J1sbn0pVLgBmqtWOQArjgIFbiz47MD+fzFvOKD6qx5e9sJ01tCjd6WQvu3JeHn0J9hpqjPlZf+YYsltIAw=="
}
