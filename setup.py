from setuptools import setup

setup(cffi_modules=["vballoon/_fastbits_build.py:ffibuilder",
                    "vballoon/_vring_build.py:ffibuilder"])
