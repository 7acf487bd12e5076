"""qg-tokenizer: the Quantised Global Autoencoder as a Hugging Face-native image tokenizer."""
