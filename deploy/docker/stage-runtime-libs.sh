#!/usr/bin/env bash
# Copies the shared libraries Gantry's binaries need at run time out of an unpacked PyPI libtorch
# (the layout scripts/fetch-libtorch.sh and fetch-gpu-libs.sh produce: SITE/torch/lib and
# SITE/nvidia/*/lib) into DEST with the same layout, so the RPATHs baked into the torch libraries
# ($ORIGIN/../../nvidia/...) and into the binaries (SITE/torch/lib) still resolve.
#
#   cpu: libtorch_cpu + libc10 + libgomp, and the CUDA runtime and CUPTI that libtorch_cpu.so
#        links even on CPU-only hosts. No libtorch_cuda.so: the binaries then run on the CPU.
#   gpu: the above, libtorch_cuda*.so (dlopened at start when present), libc10_cuda, nvrtc glue,
#        and every NVIDIA wheel library (cuBLAS, cuDNN, cuFFT, cuSPARSE(Lt), NCCL, NVSHMEM, ...).
#
# Left out on purpose: headers, static archives, libtorch_python.so (needs libpython), libshm,
# CUPTI's profiler add-ons.
#
# Usage: stage-runtime-libs.sh SITE DEST cpu|gpu
set -euo pipefail

site=${1:?SITE}
dest=${2:?DEST}
flavour=${3:?cpu or gpu}

cpu_torch_libs=(libc10.so libtorch_cpu.so libgomp.so.1)
gpu_torch_libs=(libtorch.so libtorch_global_deps.so libc10_cuda.so libtorch_cuda.so
    libtorch_cuda_linalg.so libtorch_nvshmem.so libcaffe2_nvrtc.so)

mkdir -p "$dest/torch/lib" "$dest/nvidia/cu13/lib"
for lib in "${cpu_torch_libs[@]}"; do
    cp -a "$site/torch/lib/$lib" "$dest/torch/lib/"
done
cp -a "$site/nvidia/cu13/lib/"libcudart.so* "$site/nvidia/cu13/lib/"libcupti.so* "$dest/nvidia/cu13/lib/"

case $flavour in
    cpu) ;;
    gpu)
        for lib in "${gpu_torch_libs[@]}"; do
            cp -a "$site/torch/lib/$lib" "$dest/torch/lib/"
        done
        # Every shared object of every NVIDIA wheel (nvidia/<component>/lib/*.so*), no archives.
        (cd "$site" && find nvidia -path '*/lib/*' \( -name '*.so' -o -name '*.so.*' \) -print0 |
            xargs -0 cp -a --parents -t "$dest")
        # cudarc's NCCL loader opens libnccl.so; the wheel ships only the soname.
        ln -sf libnccl.so.2 "$dest/nvidia/nccl/lib/libnccl.so"
        ;;
    *) echo "stage-runtime-libs: flavour must be cpu or gpu, not $flavour" >&2; exit 2 ;;
esac

# Drop CUPTI's profiler add-ons that nothing here links.
rm -f "$dest/nvidia/cu13/lib/"{libnvperf_host.so,libnvperf_target.so,libpcsamplingutil.so,libcheckpoint.so}
echo "stage-runtime-libs: $flavour libraries in $dest: $(du -sh "$dest" | cut -f1)"
