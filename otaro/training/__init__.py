"""Once-for-all fine-tuning: data, bit-width paths (BPS), LAA, the trainer and its state."""
