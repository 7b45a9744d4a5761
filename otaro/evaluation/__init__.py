"""Quality per bit-width: perplexity and bits-per-byte on text, reports as table/JSON/PNG."""
