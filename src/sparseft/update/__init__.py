"""The sparse update below the layer: ``W = W0 + P_R D Q_Cᵀ`` as a basis, a support and kernels.

- :mod:`~sparseft.update.kernels`: the cost model and the torch reference of every primitive;
  the seam a device backend (CUDA/Triton) registers into, chosen per device (``kernels_for``).
- :mod:`~sparseft.update.basis`: which sides rotate (``Basis``; both, input side, output side,
  none, or one registered with ``register_basis``) and the products that follow; ``make_basis``.
- :mod:`~sparseft.update.support`: which entries train and the parameter holding them
  (``Support``; fixed, grouped, dynamic, or one registered with ``register_support``);
  ``make_support``.
- :mod:`~sparseft.update.bank`: the bases' tensors, one pair per layer group, and the eigenbasis
  calibration computes them with.
- :mod:`~sparseft.update.delta`: ``SparseDelta``, one layer's update: which route each product
  of a step takes, and the merged-weight cache.
- :mod:`~sparseft.update.function`: the autograd function over (delta, kernels), and the same
  as one operator of a ``torch.compile`` graph (``sparseft::update``).

Nothing here imports the layer, the tuner or the app.
"""

from .bank import BasisBank, block_eigenbasis, eigenbasis
from .basis import BASES, Basis, IdentityBasis, InputRotatedBasis, OutputRotatedBasis, RotatedBasis, make_basis, register_basis
from .delta import SparseDelta
from .function import SparseUpdate
from .kernels import GRAD_PATHS, SAMPLED, TorchKernels, kernels_for, register_kernels, use_kernels
from .support import SUPPORTS, DynamicSupport, FixedSupport, GroupedSupport, Support, make_support, register_support

__all__ = ["BASES", "GRAD_PATHS", "SAMPLED", "SUPPORTS", "Basis", "BasisBank", "DynamicSupport", "FixedSupport", "GroupedSupport",
           "IdentityBasis", "InputRotatedBasis", "OutputRotatedBasis", "RotatedBasis", "SparseDelta", "SparseUpdate", "Support",
           "TorchKernels", "block_eigenbasis", "eigenbasis", "kernels_for", "make_basis", "make_support", "register_basis", "register_kernels",
           "register_support", "use_kernels"]
