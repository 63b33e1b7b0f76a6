// Stand-in for the CUDA toolkit header of the same name: the emulated device.
#pragma once
#include "emu/cuda_device.h"
