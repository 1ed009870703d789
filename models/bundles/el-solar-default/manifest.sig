{
  "key_id": "hq",
  "signature": "HhOcr18/Id9W5nSnVAfNfukrWdOTVti0n6WfKGS3/lu6Cuq+0GkVRxTIAdTnzRkX8ey+iXJUoq1yzwzqJWN+CQ=="
}
