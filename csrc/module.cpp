// The Python module tfkernels._C. Importing it loads this library, whose static
// initialisers register the ops with the dispatcher; the module itself only
// reports how it was built. Not part of the CMake library (no Python there).
#ifdef TFKERNELS_PYTHON_MODULE
#include <Python.h>

#include "tfkernels_build_config.h"

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:O,s:s,s:s}",
                       "torch_version", TFKERNELS_BUILT_TORCH_VERSION,
                       "cuda", TFKERNELS_BUILT_WITH_CUDA ? Py_True : Py_False,
                       "cuda_version", TFKERNELS_BUILT_CUDA_VERSION,
                       "cuda_archs", TFKERNELS_BUILT_CUDA_ARCHS);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this extension was built."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
#endif
