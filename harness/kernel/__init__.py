"""A Linux source tree's own ``arch/arm64/kvm/hyp/pgtable.c``: find the tree, probe its kvm_pgtable API
(:mod:`harness.kernel.tree`) and build the walker's objects exactly as kbuild does, out of tree and cached
(:mod:`harness.kernel.build`)."""
