from setuptools import setup

# The two cffi modules use only the limited C API (cffi builds them with Py_LIMITED_API): one
# abi3 wheel per platform serves every Python >= 3.11.
setup(cffi_modules=["vballoon/fpmap/_fastbits_build.py:ffibuilder",
                    "vballoon/virtio/_vring_build.py:ffibuilder"],
      options={"bdist_wheel": {"py_limited_api": "cp311"}})
