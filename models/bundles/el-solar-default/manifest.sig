{
  "key_id": "hq",
  "signature": "haEZfCiTOq2+ZEZr4L4QljRPRwh8JqtlFGrQ8z7Nrh+qI0G1LlwC6+XT575tQy4eSTUy0+E4qYNOU130d5+dBw=="
}
