#!/usr/bin/env bash
# The system programs some tests check artifacts with (Debian packages): Chromium renders bench's HTML
# report, sshd serves the SSH device test (apt-get, as root or with sudo). And the reference the GGUF tests
# compare with: llama.cpp's own convert_hf_to_gguf.py, its conversion/ package and gguf-py, unpacked from the
# llama-cpp-python sdist that pyproject pins (pip download from the package registry; pip's cache usually has it).
# Each step is a no-op when its result is already there.
set -euo pipefail
if ! command -v chromium >/dev/null || ! [ -x /usr/sbin/sshd ]; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    echo "installing chromium and openssh-server (Debian packages the tests need)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium openssh-server \
        >/dev/null
fi

version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../pyproject.toml")  # the pin
converter=${QUANTKIT_LLAMA_CONVERTER:-$HOME/.cache/quantkit/llama.cpp-converter-$version}
if ! [ -f "$converter/convert_hf_to_gguf.py" ]; then
    echo "unpacking llama.cpp's converter from the llama-cpp-python $version sdist into $converter" >&2
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    tar -xzf "$tmp/llama_cpp_python-$version.tar.gz" -C "$tmp" \
        "llama_cpp_python-$version/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$version/vendor/llama.cpp/conversion" "llama_cpp_python-$version/vendor/llama.cpp/gguf-py"
    mkdir -p "$(dirname "$converter")"
    rm -rf "$converter.partial"
    mv "$tmp/llama_cpp_python-$version/vendor/llama.cpp" "$converter.partial"
    mv "$converter.partial" "$converter"
fi
