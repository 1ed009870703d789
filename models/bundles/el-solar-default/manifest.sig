{
  "key_id": "hq",
  "signature": "4Z40XcKe/k6T4HM3w5UDTEarNUOf8W28QbBclNvmwnAdI/U5cjhHyzWokt9LaPsMc8hQaevPvJnp7JKZSfk9Cw=="
}
