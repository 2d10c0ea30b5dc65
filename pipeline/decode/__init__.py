"""Bytes in, tensors out: fetching images, decoding them in bounded children, tokenizing captions."""
