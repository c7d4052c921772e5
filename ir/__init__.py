"""The compiler's middle: graph IR, index-sum stages, and the derivation of gradients."""
