// Every rule for the storages whose id % kStepParts is 0 (fused_step.cuh).
#include "fused_step.cuh"

UF_STEP_PART(0)
