{
  "key_id": "hq",
  "signature": "Y0aTSLV5L7+0OkaX0OTq7KpyfzsebSQKK9t5DVshtZRj/Cw62SCTheTZpoBSUxmcDe4muaIcFc9vvQ1BoVN9BQ=="
}
