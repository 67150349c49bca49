// The thread-local message behind fmoe_last_error().
#include "core/status.h"

#include <cstdarg>
#include <cstdio>

namespace fmoe {
namespace {
thread_local std::string t_last_error;
}

Status set_error(Status code, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  t_last_error = buf;
  return code;
}

void clear_error() { t_last_error.clear(); }

}  // namespace fmoe

extern "C" FMOE_API const char* fmoe_last_error(void) { return fmoe::t_last_error.c_str(); }
