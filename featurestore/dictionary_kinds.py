"""What a dictionary can be, by name: its architecture, how a shared basis spans checkpoints,
and the outside formats it is read from and written to.

The names live apart from the model (featurestore.crosscoder) and the format readers, which
import torch, so that the command line lists them without importing it.
"""

ARCHS = ("vanilla", "batchtopk", "topk", "jumprelu", "matryoshka")
K_ARCHS = ("batchtopk", "topk", "matryoshka")  # the archs whose sparsity is set by k
THRESHOLD_ARCHS = ("batchtopk", "matryoshka")  # batch top-k in training, a threshold after
DEFAULT_ARCH = "batchtopk"

# pooled: one encoder/decoder for activations pooled from every checkpoint; crosscoder: one
# decoder slice per checkpoint over a shared latent code.
BASIS_KINDS = ("pooled", "crosscoder")

IMPORT_FORMATS = ("saelens", "sparsify", "dictionary_learning")
EXPORT_FORMATS = ("saelens", "sparsify")
