{
  "key_id": "hq-2026-12-07",
  "signature": "svg/aDcd43hA8dcCR9fyzDNruugbfstEFyjM4MdnfUTykQk/go4h+ViDpX3el3IlTV8/gMgSeiacJE75v725DQ=="
}
