/* v4rt's kernel timeline tracer: a CUPTI injection library that writes one CSV line per kernel
 * (graph nodes of a replayed CUDA graph included) with the GPU's own start and end timestamps.
 * nsys is the usual tool for this; the GPU machine we measure on has CUPTI but no nsys.
 *
 * Build on the GPU machine (the script picks the newest CUpti_ActivityKernelN of its headers):
 *   bash scripts/trace-step.sh build
 * Use:
 *   CUDA_INJECTION64_PATH=/tmp/libv4rt-trace.so V4RT_TRACE_OUT=trace.csv v4rt bench ...
 * Columns: correlation id (one per launch; every node of one graph launch shares it), graph id
 * (0 outside graphs), graph node id, start ns, end ns, grid x, block x, kernel name.
 * Kernel records are taken with CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, which does not serialize
 * kernels; compare the traced run's step time with an untraced one to see what tracing costs. */
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef KREC
#define KREC CUpti_ActivityKernel9
#endif

#define BUFFER_BYTES (16u << 20)

static FILE *out;

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
    *buffer = (uint8_t *)aligned_alloc(8, BUFFER_BYTES);
    *size = *buffer ? BUFFER_BYTES : 0;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size, size_t valid) {
    (void)size;
    CUpti_Activity *record = NULL;
    while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
        if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && record->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
        const KREC *k = (const KREC *)record;
        if (out)
            fprintf(out, "%u,%u,%llu,%llu,%llu,%d,%d,%s\n", k->correlationId, k->graphId,
                    (unsigned long long)k->graphNodeId, (unsigned long long)k->start, (unsigned long long)k->end,
                    k->gridX, k->blockX, k->name ? k->name : "?");
    }
    size_t dropped = 0;
    if (cuptiActivityGetNumDroppedRecords(ctx, stream, &dropped) == CUPTI_SUCCESS && dropped)
        fprintf(stderr, "v4rt-trace: %zu kernel records dropped\n", dropped);
    free(buffer);
}

static void finish(void) {
    cuptiActivityFlushAll(1);
    if (out) fclose(out);
    out = NULL;
}

int InitializeInjection(void) {
    const char *path = getenv("V4RT_TRACE_OUT");
    out = fopen(path ? path : "v4rt-trace.csv", "w");
    if (!out) {
        fprintf(stderr, "v4rt-trace: cannot open %s\n", path ? path : "v4rt-trace.csv");
        return 0;
    }
    if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
        fprintf(stderr, "v4rt-trace: CUPTI refused the kernel activity\n");
        return 0;
    }
    cuptiActivityFlushPeriod(200);
    atexit(finish);
    return 1;
}
