// Default event methods of Backend: a backend without timing support says so.
#include "core/backend.h"

namespace fmoe {

Status Backend::event_create(BackendEvent**) {
  return set_error(FMOE_ERR_UNSUPPORTED, "fmoe_event_create: this backend has no events");
}
Status Backend::event_destroy(BackendEvent*) {
  return set_error(FMOE_ERR_UNSUPPORTED, "fmoe_event_destroy: this backend has no events");
}
Status Backend::event_record(BackendEvent*, BackendStream*) {
  return set_error(FMOE_ERR_UNSUPPORTED, "fmoe_event_record: this backend has no events");
}
Status Backend::event_elapsed_ms(BackendEvent*, BackendEvent*, double*) {
  return set_error(FMOE_ERR_UNSUPPORTED, "fmoe_event_elapsed_ms: this backend has no events");
}
Status Backend::event_query(BackendEvent*, bool*) {
  return set_error(FMOE_ERR_UNSUPPORTED, "fmoe_event_query: this backend has no events");
}

}  // namespace fmoe
