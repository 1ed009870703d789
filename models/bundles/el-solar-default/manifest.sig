{
  "key_id": "hq-2026-12",
  "signature": "LYrn56A5UGlAM7pcUrwWgmCSxAExBTDpYqMdwLUu6+SEw5vnQ4NI2Q6zpNPtsGbQUOHn0DeLF9cbOhP5F7mEDg=="
}
