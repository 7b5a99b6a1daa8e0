"""The pipeline's stages around training: ``prepare`` (data, split, partitions),
``checkpoint`` (save, verify, load), ``synthesize`` (the synthetic set), ``tracking``
(TensorBoard / MLflow). Evaluation and the report are their own packages."""
