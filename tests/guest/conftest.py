"""Fixtures of the guest tests: real file systems and disks built once per session (see guestimages.py).

The helpers live in guestimages.py rather than here so that test modules import them by a name no other
conftest.py in the suite shares.
"""
from support.guestimages import (ext_images, fat_images, gpt_disk, guest_tools, mbr_disk, ntfs_images,  # noqa: F401
                         small_fs, xfs_images)
