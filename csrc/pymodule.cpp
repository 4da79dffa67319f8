// Makes the shared library importable as `batchkl_ext._C`. The ops register
// themselves through static initialisers (TORCH_LIBRARY), so the module itself
// exposes nothing; importing it is what loads the library.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
