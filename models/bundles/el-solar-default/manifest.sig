{
  "key_id": "hq",
  "signature": "VEQY3YHIgM6yichcKfPDp+5ZIZT6NR0NxpLGMmXHpLwUWuFsLktnCQ+lL2B3dq9L7u63MRVvJbvbG18HYthwCg=="
}
