"""Batch norm for autodiff frameworks: one module per framework, each loaded on its own.

- `cupy_bn.integrations.autograd`: `batch_norm` as a HIPS autograd primitive (any order);
- `cupy_bn.integrations.mygrad`: `batch_norm` as a MyGrad operation on `mygrad.Tensor`s;
- `cupy_bn.integrations.thinc`: `BatchNorm`, a Thinc `Model` (params "G" and "b");
- `cupy_bn.integrations.torch`: `batch_norm` on a `torch.library` custom op (first and second
  order, traceable), and `BatchNorm1d/2d/3d` subclasses of PyTorch's modules.

Importing this package loads no framework; importing one of its modules loads that module's
framework. Each adapter translates its framework's arrays and derivative hooks into calls of
`cupy_bn.functional`, so statistics, running averages, dtypes and errors are the core's.
Conventions and what runs where: docs/integrations.md.
"""
