"""Model files and text, in and out: everything that touches the disk or a tokenizer file.

loading         resolve_model ("smollm2", "gemma3", a .gguf, a checkpoint dir), load_tokenizer, load_weights, load_model
weights         Hugging Face safetensors checkpoint directories -> params (one rule per tensor name)
gguf            GGUF files: metadata, dequantized tensors, the tokenizer (torch-free)
export          params -> a Hugging Face checkpoint directory
chat_templates  a model's chat template, from its files
end_ids         the ids that end a reply, from a model's files
chat_models     a model ready to chat (weights, tokenizer, template, end ids)
assets          the offline assets (SmolLM2 and Gemma 3 GGUFs, Austen, Moby Dick), fetched and verified once
corpora         named corpora and text files -> paragraph-aligned text and token ids
"""
