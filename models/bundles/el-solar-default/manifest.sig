{
  "key_id": "hq",
  "signature": "rJWcwy6ZGA314TkChDqV4CXa5YsZdxiQGoQvbm4Eqid9ztv62U04YXV0UfGFHc0vJDMGB5lcXxPTA3iVzUIpBQ=="
}
