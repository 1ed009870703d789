{
  "key_id": "hq",
  "signature": "pgkfIb/HotGlKgjiSdG6W1XZgh6owfAMHt6guF+F94UWzj1BFYDNPcFypB8n0oaL9SnCJO6d77CpiZjFpTl/BA=="
}
