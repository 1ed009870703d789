{
  "key_id": "hq",
  "signature": "+qynXyLITz5wR6fHIWWFRzRRXO5O7l0mfHR5gTt/2I0f8u+rJYoOWkrKFiC7rywYeuUiVofoeDr6dTW+p0CBCA=="
}
