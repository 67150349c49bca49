// Errors are values: a failing check sets the thread-local message (fmoe_last_error) and returns
// a status; nothing aborts.
#pragma once

#include <string>

#include "fmoe.h"

namespace fmoe {

using Status = int;  // an fmoe_status

// Sets the thread-local message and returns `code`. printf-style.
Status set_error(Status code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void clear_error();

}  // namespace fmoe

// Returns early from the enclosing function when `expr` yields a non-OK status.
#define FMOE_TRY(expr)                        \
  do {                                        \
    ::fmoe::Status fmoe_try_status_ = (expr); \
    if (fmoe_try_status_ != FMOE_OK) return fmoe_try_status_; \
  } while (0)

// Argument check: `fn` is the ABI function name, the message names the argument.
#define FMOE_CHECK_ARG(cond, fn, ...)                                           \
  do {                                                                          \
    if (!(cond)) return ::fmoe::set_error(FMOE_ERR_INVALID_ARGUMENT, fn ": " __VA_ARGS__); \
  } while (0)
