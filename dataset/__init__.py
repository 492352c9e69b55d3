"""Records -> tokenized, labelled samples -> batches. This package owns which tokens carry loss.

Modules (import them directly; nothing heavy is imported with the package):
- `dataset.loading`: `load_records(path, image_folder=..., skip_invalid=...)` validates a
  chat.json / JSONL file before training and returns a memory-mapped `datasets.Dataset`.
- `dataset.conversation`: `encode_conversation(...)`, the ChatML rendering and the label rule;
  `fit_to_length(...)`, the truncation rule.
- `dataset.processor`: `VLMProcessor(tokenizer, image_token_id, image_processor)`, the processor
  seam: conversations + image sizes -> ids, labels; images -> `pixel_values`, `image_sizes`.
- `dataset.samples`: `tokenize_records(...)` (cached `datasets.map`).
- `dataset.supervised`: `SupervisedDataset`, one tokenized sample -> tensors.
- `dataset.collator`: `SupervisedCollator(pad_token_id)`.
- `dataset.build`: `build_supervised_dataset(...)`, all of the above in one call.
- `dataset.preference`: preference pairs (DPO): `tokenize_pairs`, `PreferenceDataset`,
  `PreferenceCollator` (chosen rows, then rejected rows), `build_preference_dataset(...)`.
"""
