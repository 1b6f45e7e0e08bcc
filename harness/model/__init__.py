"""The decoder and its KV cache (`decoder`), the model spec (`spec`), Hugging Face loading (`hf`)."""
