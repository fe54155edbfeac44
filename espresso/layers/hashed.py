"""HashedInnerProduct: HashedNets (Chen, Wilson, Tyree, Weinberger and Chen, ICML 2015).

An InnerProduct whose N x K virtual weight matrix V is drawn from B real weights w (the layer's
one weight blob, B = hashed_param.buckets) by a fixed hash of each entry's index:
V[i, j] = sign(i, j) * w[bucket(i, j)].  Training updates the real weights only: each one's
gradient is the sum of its virtual entries' gradients, times their signs.

The hash (docs/compression.md), for the entry at linear index k = i * K + j (row-major, Caffe's
weight layout) and seed s = hashed_param.seed: u = splitmix64(k XOR (s << 32)), where
splitmix64(x) adds 0x9E3779B97F4A7C15 (mod 2^64), then x ^= x >> 30; x *= 0xBF58476D1CE4E5B9;
x ^= x >> 27; x *= 0x94D049BB133111EB; x ^= x >> 31.  bucket = (u >> 32) mod B; sign = +1 when
u's lowest bit is 0, else -1.  Honors inner_product_param's num_output, bias_term,
weight_filler (drawn for the virtual matrix's shape, the first B values kept), bias_filler and
axis; not transpose.
"""

import numpy as np

from espresso.errors import ShapeError
from espresso.layer import Layer, register


def splitmix64(x):
    """SplitMix64's output function of uint64 values (arithmetic mod 2^64)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_layout(rows, cols, buckets, seed=0):
    """(bucket, sign) of every entry of a rows x cols virtual matrix, flat in row-major order."""
    u = splitmix64(np.arange(rows * cols, dtype=np.uint64) ^ (np.uint64(seed) << np.uint64(32)))
    bucket = ((u >> np.uint64(32)) % np.uint64(buckets)).astype(np.int64)
    sign = np.where(u & np.uint64(1), -1.0, 1.0)
    return bucket, sign


@register
class HashedInnerProductLayer(Layer):
    """y = x V^T + b with V hashed from hashed_param.buckets real weights (see the module)."""

    type = "HashedInnerProduct"
    param = "inner_product_param"
    exact_bottoms = exact_tops = 1
    capturable = False  # the gradient's bincount sizes its result on the host

    def setup(self, bottom, top):
        p, buckets = self.p, self.lp.hashed_param.buckets
        if p.num_output <= 0:
            self.fail(f"inner_product_param.num_output: must be > 0, got {p.num_output}")
        if p.transpose:
            self.fail("inner_product_param.transpose is not supported by HashedInnerProduct")
        axis = self.canonical_axis(bottom[0], p.axis, "inner_product_param.axis")
        self.N, self.K = p.num_output, bottom[0].count_range(axis)
        if not 1 <= buckets <= self.N * self.K:
            self.fail(f"hashed_param.buckets: 1 to {self.N * self.K} real weights (the virtual matrix's size), "
                      f"got {buckets}")
        virtual = self.new_blob((self.N, self.K), p.weight_filler)  # the filler sees the virtual fan-in/out
        self.blobs = [self.new_blob((buckets,))]
        self.blobs[0].data[...] = virtual.data.reshape(-1)[:buckets]
        if p.bias_term:
            self.blobs.append(self.new_blob((self.N,), p.bias_filler))
        bucket, sign = hash_layout(self.N, self.K, buckets, self.lp.hashed_param.seed)
        self.bucket = self.backend.to_device(bucket)
        self.sign = self.backend.to_device(sign.reshape(self.N, self.K), self.dtype)
        # workspaces: the virtual matrix and its gradient (only the buckets' sums are made per call)
        self.virtual, self.grad = (self.xp.empty((self.N, self.K), self.dtype) for _ in range(2))

    def reshape(self, bottom, top):
        axis = self.canonical_axis(bottom[0], self.p.axis, "inner_product_param.axis")
        if bottom[0].count_range(axis) != self.K:
            self.fail(f"bottom shape {bottom[0].shape} gives {bottom[0].count_range(axis)} inputs, "
                      f"the layer was made for {self.K}", ShapeError)
        self.M = bottom[0].count_range(0, axis)
        top[0].reshape(bottom[0].shape[:axis] + (self.N,))
        self.ones(self.M)

    def virtual_weights(self):
        """V = sign * w[bucket], written into the layer's workspace."""
        self.xp.take(self.blobs[0].data, self.bucket, out=self.virtual.reshape(-1))
        self.virtual *= self.sign
        return self.virtual

    def forward(self, bottom, top):
        y = top[0].data.reshape(self.M, self.N)
        self.k.matmul(bottom[0].data.reshape(self.M, self.K), self.virtual_weights().T, out=y)
        if self.p.bias_term:
            y += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        dy, x = top[0].diff.reshape(self.M, self.N), bottom[0].data.reshape(self.M, self.K)
        if self.param_propagate_down[0]:
            self.k.matmul(dy.T, x, out=self.grad)
            self.grad *= self.sign
            self.blobs[0].diff[...] += self.xp.bincount(self.bucket, weights=self.grad.reshape(-1),
                                                        minlength=self.blobs[0].count)
        if self.p.bias_term and self.param_propagate_down[1]:
            self.add_row_sums(dy, self.blobs[1].diff)
        if propagate_down[0]:
            self.k.matmul(dy, self.virtual, out=bottom[0].diff.reshape(self.M, self.K))  # forward's V
