{
  "key_id": "hq",
  "signature": "mFQveAu0Q4rXqG/8P5SXVKNZ1kp4a8KR5u4LpEIT8qPozuoDoPB1fhO06ylUmKKZJVOYOYpWkAqNjpO/7MDeBA=="
}
