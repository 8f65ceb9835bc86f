// Generated from uba_fused/registry.py by `python uba_fused/registry.py`: do not edit by hand.
#pragma once

namespace uf {

enum TensorCol : int { kParam = 0, kGradSlot = 1, kStep = 2, kNumel = 3, kGroup = 4, kInfo = 5, kMaster = 6, kState0 = 7 };
enum GroupCol : int { kLr = 0, kKind = 1, kWarmup = 2, kTotal = 3, kMinRatio = 4, kPhi = 5, kHasState = 6, kMaxGradNorm = 7, kClipEps = 8, kSeed = 9, kGroupCols = 10 };
enum DType : int { kFloat32 = 0, kBfloat16 = 1, kFloat16 = 2, kNumDtypes = 3 };
enum Codec : int { kNearest = 0, kRemainder = 1, kCopy = 2, kStochastic = 3, kCorrection = 4, kNumCodecs = 5 };
enum StateRounding : int { kStateNearest = 0, kStateStochastic = 1 };
enum ScheduleKind : int { kConstant = 0, kUba = 1, kCosine = 2, kLinear = 3, kRex = 4, kNumKinds = 5 };
enum RuleId : int { kAdamw = 0, kAdabelief = 1, kLion = 2, kSgd = 3, kAdan = 4, kNumRules = 5 };
// The storages the kernels are compiled for, by id: X(id, param DType, state DType, Codec, StateRounding).
#define UF_STORAGES(X) X(0, kFloat32, kFloat32, kNearest, kStateNearest) X(1, kBfloat16, kBfloat16, kNearest, kStateNearest) X(2, kBfloat16, kBfloat16, kNearest, kStateStochastic) X(3, kFloat16, kFloat16, kNearest, kStateNearest) X(4, kBfloat16, kFloat32, kNearest, kStateNearest) X(5, kFloat16, kFloat32, kNearest, kStateNearest) X(6, kFloat32, kBfloat16, kNearest, kStateNearest) X(7, kFloat32, kBfloat16, kNearest, kStateStochastic) X(8, kBfloat16, kBfloat16, kRemainder, kStateNearest) X(9, kBfloat16, kBfloat16, kRemainder, kStateStochastic) X(10, kBfloat16, kFloat32, kRemainder, kStateNearest) X(11, kFloat16, kFloat16, kCopy, kStateNearest) X(12, kFloat16, kFloat32, kCopy, kStateNearest) X(13, kBfloat16, kBfloat16, kStochastic, kStateNearest) X(14, kBfloat16, kBfloat16, kStochastic, kStateStochastic) X(15, kFloat16, kFloat16, kStochastic, kStateNearest) X(16, kBfloat16, kFloat32, kStochastic, kStateNearest) X(17, kFloat16, kFloat32, kStochastic, kStateNearest) X(18, kBfloat16, kBfloat16, kCorrection, kStateNearest) X(19, kBfloat16, kBfloat16, kCorrection, kStateStochastic) X(20, kBfloat16, kFloat32, kCorrection, kStateNearest)
constexpr int kNumStorages = 21;
constexpr int kChunk = 4096;
constexpr long long kNoGrad = -1;
constexpr int kMaxStates = 4;

// Each rule's group-table columns (after GroupCol) and its id and number of state slots: a struct, so that a
// template can take it (csrc/updates.cuh).
struct adamw { static constexpr int kId = 0, kStates = 2; enum Col : int { kBeta1 = 10, kBeta2 = 11, kOneMinusBeta1 = 12, kOneMinusBeta2 = 13, kLogBeta1 = 14, kLogBeta2 = 15, kEps = 16, kWeightDecay = 17, kCols = 18 }; };
struct adabelief { static constexpr int kId = 1, kStates = 2; enum Col : int { kBeta1 = 10, kBeta2 = 11, kOneMinusBeta1 = 12, kOneMinusBeta2 = 13, kLogBeta1 = 14, kLogBeta2 = 15, kEps = 16, kWeightDecay = 17, kCols = 18 }; };
struct lion { static constexpr int kId = 2, kStates = 1; enum Col : int { kBeta1 = 10, kBeta2 = 11, kOneMinusBeta1 = 12, kOneMinusBeta2 = 13, kWeightDecay = 14, kCols = 15 }; };
struct sgd { static constexpr int kId = 3, kStates = 1; enum Col : int { kMomentum = 10, kOneMinusDampening = 11, kNesterov = 12, kWeightDecay = 13, kCols = 14 }; };
struct adan { static constexpr int kId = 4, kStates = 4; enum Col : int { kBeta1 = 10, kBeta2 = 11, kBeta3 = 12, kOneMinusBeta1 = 13, kOneMinusBeta2 = 14, kOneMinusBeta3 = 15, kLogBeta1 = 16, kLogBeta2 = 17, kLogBeta3 = 18, kEps = 19, kWeightDecay = 20, kNoProx = 21, kCols = 22 }; };

// abi() of registry.py, which uba_fused._C exports as REGISTRY.
constexpr const char* kRegistry = R"json({"chunk":4096,"codecs":["nearest","remainder","copy","stochastic","correction"],"dtypes":["float32","bfloat16","float16"],"group_cols":["lr","kind","warmup","total","min_ratio","phi","has_state","max_grad_norm","clip_eps","seed"],"no_grad":-1,"rules":{"adabelief":{"consts":["beta1","beta2","one_minus_beta1","one_minus_beta2","log_beta1","log_beta2","eps","weight_decay"],"id":1,"states":["exp_avg","exp_avg_var"]},"adamw":{"consts":["beta1","beta2","one_minus_beta1","one_minus_beta2","log_beta1","log_beta2","eps","weight_decay"],"id":0,"states":["exp_avg","exp_avg_sq"]},"adan":{"consts":["beta1","beta2","beta3","one_minus_beta1","one_minus_beta2","one_minus_beta3","log_beta1","log_beta2","log_beta3","eps","weight_decay","no_prox"],"id":4,"states":["exp_avg","exp_avg_sq","exp_avg_diff","neg_pre_grad"]},"lion":{"consts":["beta1","beta2","one_minus_beta1","one_minus_beta2","weight_decay"],"id":2,"states":["exp_avg"]},"sgd":{"consts":["momentum","one_minus_dampening","nesterov","weight_decay"],"id":3,"states":["momentum_buffer"]}},"schedule_kinds":["constant","uba","cosine","linear","rex"],"state_roundings":["nearest","stochastic"],"storages":[["float32","float32","nearest","nearest"],["bfloat16","bfloat16","nearest","nearest"],["bfloat16","bfloat16","nearest","stochastic"],["float16","float16","nearest","nearest"],["bfloat16","float32","nearest","nearest"],["float16","float32","nearest","nearest"],["float32","bfloat16","nearest","nearest"],["float32","bfloat16","nearest","stochastic"],["bfloat16","bfloat16","remainder","nearest"],["bfloat16","bfloat16","remainder","stochastic"],["bfloat16","float32","remainder","nearest"],["float16","float16","copy","nearest"],["float16","float32","copy","nearest"],["bfloat16","bfloat16","stochastic","nearest"],["bfloat16","bfloat16","stochastic","stochastic"],["float16","float16","stochastic","nearest"],["bfloat16","float32","stochastic","nearest"],["float16","float32","stochastic","nearest"],["bfloat16","bfloat16","correction","nearest"],["bfloat16","bfloat16","correction","stochastic"],["bfloat16","float32","correction","nearest"]],"tensor_cols":["param","grad_slot","step","numel","group","info","master"]})json";

}  // namespace uf
