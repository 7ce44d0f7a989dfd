"""Disks: image definitions, opening and locking (image.py), and plugging virtio-blk devices into a machine
(attach.py)."""
