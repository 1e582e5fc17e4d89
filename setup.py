from setuptools import setup

setup(cffi_modules=["vballoon/fpmap/_fastbits_build.py:ffibuilder",
                    "vballoon/virtio/_vring_build.py:ffibuilder"])
