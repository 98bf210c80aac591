// Python entry point of the prebuilt CUDA extension, so that setup.py's
// `fastdiff._C` imports as a module. The module itself is empty: loading the
// shared library runs the TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL static
// registrations of every csrc/<op>/<op>_binding.cpp, which is what makes
// torch.ops.fastdiff.* available. The JIT build (fastdiff/_extension.py)
// loads the same sources with torch.ops.load_library and never calls this.
#include <Python.h>

static struct PyModuleDef fastdiff_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "fastdiff CUDA kernels; importing this module registers torch.ops.fastdiff.*_cuda",
    -1,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastdiff_c_module); }
