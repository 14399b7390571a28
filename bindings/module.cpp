#include "register.hpp"

#ifndef LIVEMIG_VERSION
#define LIVEMIG_VERSION "0.0.0"
#endif

PYBIND11_MODULE(_core, m) {
  m.doc() = "livemig's C++ core: page bitmaps, dirty tracking, userfaultfd placement, the wire.";
  m.attr("__version__") = LIVEMIG_VERSION;
  livemig::py_bindings::register_errors(m);
  livemig::py_bindings::register_bitmap(m);
  livemig::py_bindings::register_balloon(m);
  livemig::py_bindings::register_verify(m);
  livemig::py_bindings::register_dest(m);
  livemig::py_bindings::register_source(m);
  livemig::py_bindings::register_wire(m);
  livemig::py_bindings::register_guest(m);
  livemig::py_bindings::register_session(m);
  livemig::py_bindings::register_bench(m);
  livemig::py_bindings::register_tls(m);
  livemig::py_bindings::register_attach(m);
  livemig::py_bindings::register_attach_client(m);
}
