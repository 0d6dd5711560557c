//! virtio-blk (next step).
