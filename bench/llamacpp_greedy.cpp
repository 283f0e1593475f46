// Greedy decoding through llama.cpp's C API, from token ids to token ids, for bench/peers.py's agreement check.
//
//   llamacpp_greedy MODEL.gguf N_PREDICT N_GPU_LAYERS THREADS ID[,ID...] [OVERRIDE_CPU_PATTERN]
//
// Prints one line "ids: a b c ..." (the N_PREDICT argmax tokens, end-of-generation tokens included) and one line
// "margins: ..." (top-1 minus top-2 logit at each step: where the two engines part, a small margin says rounding).
// GREEDY_KV_F32=1 in the environment stores the KV cache in F32 (llama.cpp's default is F16).
// GREEDY_LOGITS_FILE=path writes each step's logits there (float32, n_vocab per step).
// GREEDY_NO_FLASH_ATTN=1 turns flash attention off (llama.cpp's default is on where the backend has it).
// OVERRIDE_CPU_PATTERN (e.g. "exps") keeps matching tensors in CPU memory, as llama-bench's -ot exps=CPU does.
// Built by bench/peers.py against the llama.cpp it builds; tandem's side is tandem.load(...).generate.

#include "ggml-backend.h"
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

static std::vector<llama_token> parse_ids(const std::string & s) {
    std::vector<llama_token> ids;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) {
        ids.push_back((llama_token) std::stol(item));
    }
    return ids;
}

int main(int argc, char ** argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s MODEL N_PREDICT N_GPU_LAYERS THREADS ID[,ID...] [OVERRIDE_CPU_PATTERN]\n", argv[0]);
        return 2;
    }
    const int n_predict = atoi(argv[2]);
    const int threads = atoi(argv[4]);
    std::vector<llama_token> prompt = parse_ids(argv[5]);

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = atoi(argv[3]);
    std::vector<llama_model_tensor_buft_override> overrides;
    if (argc > 6) {  // one pattern -> the CPU buffer type, then the null terminator
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        overrides.push_back({argv[6], ggml_backend_dev_buffer_type(cpu)});
        overrides.push_back({nullptr, nullptr});
        mp.tensor_buft_overrides = overrides.data();
    }
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (model == nullptr) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (prompt.size() + n_predict + 1);
    cp.n_batch = (uint32_t) prompt.size();
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    if (getenv("GREEDY_KV_F32") != nullptr) {  // llama.cpp's default KV cache is F16; F32 to isolate that rounding
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
    }
    if (getenv("GREEDY_NO_FLASH_ATTN") != nullptr) {
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }

    FILE * dump = getenv("GREEDY_LOGITS_FILE") ? fopen(getenv("GREEDY_LOGITS_FILE"), "wb") : nullptr;
    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    std::vector<llama_token> out;
    std::vector<float> margins;
    std::vector<llama_token> step = prompt;
    llama_pos pos = 0;
    for (int i = 0; i < n_predict; ++i) {
        llama_batch_ext_clear(batch);
        for (size_t j = 0; j < step.size(); ++j) {
            const int32_t idx = llama_batch_ext_add_token(batch, 0, step[j]);
            const llama_pos p = pos + (llama_pos) j;
            llama_batch_ext_set_pos(batch, idx, &p);
        }
        llama_batch_ext_set_output_logits(batch, (int32_t) step.size() - 1, true);
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch) != 0) {
            fprintf(stderr, "decode failed at step %d\n", i);
            return 1;
        }
        pos += (llama_pos) step.size();
        const float * logits = llama_get_logits_ith(ctx, -1);
        if (dump != nullptr) {
            fwrite(logits, sizeof(float), (size_t) n_vocab, dump);
        }
        int best = 0, second = -1;
        for (int v = 1; v < n_vocab; ++v) {
            if (logits[v] > logits[best]) {
                second = best;
                best = v;
            } else if (second < 0 || logits[v] > logits[second]) {
                second = v;
            }
        }
        out.push_back(best);
        margins.push_back(logits[best] - logits[second]);
        step.assign(1, best);
    }
    printf("ids:");
    for (llama_token t : out) printf(" %d", t);
    printf("\nmargins:");
    for (float m : margins) printf(" %.4g", m);
    printf("\n");
    if (dump != nullptr) {
        fclose(dump);
    }
    llama_batch_ext_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
