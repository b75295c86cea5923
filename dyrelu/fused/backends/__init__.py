"""The backends of the fused path, one module each, all implementing the same named kernels.

A kernel is a plain function of tensors (the names below); a module implements the ones it has and
returns None for inputs it does not handle. ``backend.kernels(x)`` orders the modules for an input and
``backend.run(name, x, ...)`` returns the first module's result that is not None; where no module
handles an input, the op composes the result from smaller kernels (ops.py, site_math.py).

  kernel                  triton native bn  torch  what
  apply                   x      x      x   x      max_k(a_k x + b_k) [* pi] on (N, C, L)
  apply_backward          x      x      x   x      grad x, per-(n, k, c) sums, grad pi; one pass
  pool                    x                 x      per-(n, c) mean in x's dtype
  pool_acc                x                 x      per-(n, c) mean in the accumulation dtype
  row_moments             x             x   x      per-(n, c) mean and variance
  affine_rows             x             x   x      alpha_c x + beta_nc
  moments                        x                 the BN statistics in one pass
  moments_backward               x                 their gradient in one pass
  moments_backward_              x                 the same, added into grad x in place
  spatial_z                      x          x      variant C's 1x1 conv to one channel
  spatial_z_backward             x          x      its gradient
  spatial_pi              x                 x      variant C's Eq. 4
  spatial_pi_backward     x                 x      its gradient
  running_update          x                 x      BatchNorm's running statistics, on the device
  bn_coefs_math                  x                 a BN site's (N, C)-sized coefficient math
  bn_coefs_math_backward         x                 its gradient
  bn_coefs                x      x                 a BN + DY-ReLU site's statistics and coefficients
  bn_coefs_backward       x      x                 their gradient
  bn_act                         x                 a whole BN + DY-ReLU-A/B site in one call
  bn_act_backward         x      x                 its gradient
  inference_apply                x                 a prepared network's apply, in place
  inference_site                 x                 a prepared A/B site in one call

A new kernel: the function in each backend module that has it (the same name and signature) and its
name in ``KERNELS`` and the table above; the op asks ``backend.run(name, x, ...)``. A new backend: one
module here, its name in ``backend.BACKENDS``, ``backend.CHAINS`` and ``backend.choose``.
"""

KERNELS = ("apply", "apply_backward", "pool", "pool_acc", "row_moments", "affine_rows", "moments",
           "moments_backward", "moments_backward_", "spatial_z", "spatial_z_backward", "spatial_pi",
           "spatial_pi_backward", "running_update", "bn_coefs_math", "bn_coefs_math_backward", "bn_coefs",
           "bn_coefs_backward", "bn_act", "bn_act_backward", "inference_apply", "inference_site")
