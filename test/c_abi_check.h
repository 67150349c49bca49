/* CHECK(call) for the C programs of the test suite: on a failed fmoe_* call, prints the call, its
 * status and the library's message, and exits with status 1. */
#ifndef FMOE_TEST_C_ABI_CHECK_H
#define FMOE_TEST_C_ABI_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#include "fmoe.h"

#define CHECK(call)                                                                 \
  do {                                                                              \
    int status_ = (call);                                                           \
    if (status_ != FMOE_OK) {                                                       \
      fprintf(stderr, "%s failed (%d): %s\n", #call, status_, fmoe_last_error());   \
      exit(1);                                                                      \
    }                                                                               \
  } while (0)

#endif
