//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`: the compiler emits calls
//! to them, and with no libc (and a `compiler_builtins` that does not export
//! them on this target) the kernel must define them itself. They are assembly
//! so that the compiler cannot turn their loops back into calls to themselves.
//! They run in ring 3 like every caller; `rep movsb`/`rep stosb` are fast there.

core::arch::global_asm!(
    ".section .text.mem, \"ax\"",
    // void *memcpy(void *dst [rdi], const void *src [rsi], size_t n [rdx])
    ".global memcpy",
    ".type memcpy, @function",
    "memcpy:",
    "    mov rax, rdi",
    "    mov rcx, rdx",
    "    rep movsb",
    "    ret",
    // void *memmove(void *dst, const void *src, size_t n): copies backwards
    // when dst lies inside [src, src + n).
    ".global memmove",
    ".type memmove, @function",
    "memmove:",
    "    mov rax, rdi",
    "    mov rcx, rdx",
    "    cmp rdi, rsi",
    "    jbe 1f", // dst <= src: forwards is safe
    "    lea r8, [rsi + rdx]",
    "    cmp rdi, r8",
    "    jae 1f", // no overlap
    "    lea rsi, [rsi + rdx - 1]",
    "    lea rdi, [rdi + rdx - 1]",
    "    std", // backwards
    "    rep movsb",
    "    cld", // the ABI wants DF clear
    "    ret",
    "1:",
    "    rep movsb",
    "    ret",
    // void *memset(void *dst [rdi], int c [esi], size_t n [rdx])
    ".global memset",
    ".type memset, @function",
    "memset:",
    "    mov r8, rdi",
    "    mov eax, esi",
    "    mov rcx, rdx",
    "    rep stosb",
    "    mov rax, r8",
    "    ret",
    // int memcmp(const void *a [rdi], const void *b [rsi], size_t n [rdx]);
    // bcmp only needs zero / non-zero, so it is the same function.
    ".global memcmp",
    ".type memcmp, @function",
    ".global bcmp",
    ".type bcmp, @function",
    "memcmp:",
    "bcmp:",
    "    xor eax, eax",
    "    test rdx, rdx",
    "    jz 3f",
    "2:",
    "    movzx eax, byte ptr [rdi]",
    "    movzx ecx, byte ptr [rsi]",
    "    sub eax, ecx", // difference of the first unequal bytes
    "    jnz 3f",
    "    inc rdi",
    "    inc rsi",
    "    dec rdx",
    "    jnz 2b",
    "3:",
    "    ret",
);
