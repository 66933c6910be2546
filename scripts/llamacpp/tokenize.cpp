// tokexp-llama-tokenize: llama.cpp's own tokenizer as a batch CLI (public llama.h API only).
//
//   tokexp-llama-tokenize VOCAB.gguf < request.json > reply.json
//
// request: {"texts": ["...", ...], "add_special": false, "parse_special": false}
//          add_special may also be a list of booleans, one per text (both settings in one call).
// reply:   {"n_vocab": N, "ids": [[...], ...]}
//
// The defaults add_special=false, parse_special=false are those of llama.cpp's tests/test-tokenizer-0.cpp, which made
// the shipped ggml-vocab-*.gguf.inp/.out files (common_tokenize(ctx, text, add_special=false, parse_special=false)).
// The model is loaded with vocab_only = true: no tensors, no backend.
#include "llama.h"
#include <nlohmann/json.hpp>

#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

using json = nlohmann::json;

static void quiet_log(ggml_log_level level, const char * text, void * /*user*/) {
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) fputs(text, stderr);
}

static std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text, bool add_special, bool parse_special) {
    std::vector<llama_token> ids(text.size() + 16);
    int32_t n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), ids.data(), (int32_t) ids.size(), add_special, parse_special);
    if (n < 0) {  // buffer too small: -n is the number needed
        ids.resize(-n);
        n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), ids.data(), (int32_t) ids.size(), add_special, parse_special);
    }
    if (n < 0) throw std::runtime_error("llama_tokenize failed (returned " + std::to_string(n) + ")");
    ids.resize(n);
    return ids;
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s VOCAB.gguf < {\"texts\": [...], \"add_special\": false, \"parse_special\": false}\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet_log, nullptr);
    json req;
    try {
        std::string in((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
        req = json::parse(in);
    } catch (const std::exception & e) {
        fprintf(stderr, "error: stdin is not a JSON request: %s\n", e.what());
        return 2;
    }
    if (!req.is_object() || !req.contains("texts") || !req["texts"].is_array()) {
        fprintf(stderr, "error: request must be a JSON object with a \"texts\" array of strings\n");
        return 2;
    }
    const json & texts = req["texts"];
    std::vector<bool> add_special(texts.size(), false);
    if (req.contains("add_special")) {
        const json & a = req["add_special"];
        if (a.is_boolean()) add_special.assign(texts.size(), a.get<bool>());
        else if (a.is_array() && a.size() == texts.size()) {
            for (size_t i = 0; i < a.size(); i++) {
                if (!a[i].is_boolean()) { fprintf(stderr, "error: \"add_special\"[%zu] is not a boolean\n", i); return 2; }
                add_special[i] = a[i].get<bool>();
            }
        } else {
            fprintf(stderr, "error: \"add_special\" must be a boolean or a list of %zu booleans (one per text)\n", texts.size());
            return 2;
        }
    }
    const bool parse_special = req.value("parse_special", false);

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (model == nullptr) {
        fprintf(stderr, "error: llama.cpp could not load the vocabulary of %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    json out = {{"n_vocab", llama_vocab_n_tokens(vocab)}, {"ids", json::array()}};
    try {
        for (size_t i = 0; i < texts.size(); i++) {
            if (!texts[i].is_string()) throw std::runtime_error("every entry of \"texts\" must be a string");
            out["ids"].push_back(tokenize(vocab, texts[i].get<std::string>(), add_special[i], parse_special));
        }
    } catch (const std::exception & e) {
        fprintf(stderr, "error: %s\n", e.what());
        llama_model_free(model);
        return 1;
    }
    std::cout << out.dump() << "\n";
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
