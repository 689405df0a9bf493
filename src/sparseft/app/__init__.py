"""The ``sparseft`` application: the command line, the benchmark, the data loaders, the
text-classification and causal-LM training recipes and their crash-safe checkpoints.

None of this is needed to use the library: ``import sparseft`` (the sparse layers, calibration,
the optimizer, adapter save/load) needs only torch and safetensors. The application needs the
``bench`` extra (``pip install "sparseft[bench]"``: transformers, peft, tqdm, rich, matplotlib,
numpy, pyyaml, gguf); the core never imports from here.
"""
