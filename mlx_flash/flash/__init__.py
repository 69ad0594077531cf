"""The flash runtime: one paper concept per module.

- `sparsity`: which neurons are active (ReLU, or a calibrated threshold), measured on text
- `predictor`: the low-rank activation predictors
- `neuron_cache`: the sliding window of neurons kept in DRAM, and its row management
- `bundle_reader`: parallel direct reads of neuron bundles into fixed buffers
- `ffn`: the flash FFN of one layer (predict, slide the window, read, compute)
- `budget`: where the DRAM budget goes, and attaching flash FFNs to a model
"""
