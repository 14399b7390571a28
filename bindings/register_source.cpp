#include "register.hpp"

namespace py = pybind11;

namespace livemig::py_bindings {

void register_source(py::module_& /*m*/) {}

}  // namespace livemig::py_bindings
