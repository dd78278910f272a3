// The reference runtime's own encoder (its tokenizer.o, the object its dllama binary links) on texts read
// from stdin as <u32 little-endian length><bytes> records: one "ids:" line per text, as its inference
// mode encodes a prompt (isStart and addSpecialTokens true). Built by tests/reference_runtime.py.
#include <cstdint>
#include <cstdio>
#include <vector>
#include "tokenizer.hpp"

int main(int argc, char **argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s TOKENIZER.t < records\n", argv[0]);
        return 2;
    }
    Tokenizer tokenizer(argv[1]);
    std::uint32_t length;
    while (std::fread(&length, sizeof(length), 1, stdin) == 1) {
        std::vector<char> text(length + 1, '\0');
        if (std::fread(text.data(), 1, length, stdin) != length)
            return 3;
        std::vector<int> tokens(length + 3);
        int nTokens;
        tokenizer.encode(text.data(), tokens.data(), &nTokens, true, true);
        std::printf("ids:");
        for (int i = 0; i < nTokens; i++)
            std::printf(" %d", tokens[i]);
        std::printf("\n");
    }
    return 0;
}
