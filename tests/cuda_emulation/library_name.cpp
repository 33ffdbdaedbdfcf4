// The name of the torch library a build registers its ops under: the extension's name, which the
// builder makes unique per build (pks4_emu for the kernels' own source, another one for each
// mutated copy the tests build), so that several builds can be loaded into one process. Apart
// from bindings_emu.cpp so that the slow-to-compile bindings are compiled once and linked into
// every build.
#ifndef TORCH_EXTENSION_NAME
#error "torch.utils.cpp_extension defines TORCH_EXTENSION_NAME"
#endif

#define PKS4EMU_STR2(x) #x
#define PKS4EMU_STR(x) PKS4EMU_STR2(x)

namespace pks4emu {
extern const char* const library_name;
const char* const library_name = PKS4EMU_STR(TORCH_EXTENSION_NAME);
}  // namespace pks4emu
