// swift-tools-version:5.9
// The Swift side of mlx-flash: a Foundation-only library (MLXFlashKit) that talks to
// `python -m mlx_flash.server`, and a thin macOS menu-bar app (MLXFlashChat) over it.
// The app target exists only when the manifest is evaluated on macOS, so
// `swift build` / `swift test` on Linux build and test the library alone.
import PackageDescription

// Checked as in Swift 6 language mode, so the library stays data-race free.
let strictConcurrency: [SwiftSetting] = [.enableUpcomingFeature("StrictConcurrency")]

var products: [Product] = [
    .library(name: "MLXFlashKit", targets: ["MLXFlashKit"]),
]

var targets: [Target] = [
    .target(
        name: "MLXFlashKit",
        path: "Sources/MLXFlashKit",
        swiftSettings: strictConcurrency
    ),
    .testTarget(
        name: "MLXFlashKitTests",
        dependencies: ["MLXFlashKit"],
        path: "tests/swift/MLXFlashKitTests",
        swiftSettings: strictConcurrency
    ),
]

#if os(macOS)
products.append(.executable(name: "MLXFlashChat", targets: ["MLXFlashChat"]))
targets.append(
    .executableTarget(
        name: "MLXFlashChat",
        dependencies: ["MLXFlashKit"],
        path: "Sources/MLXFlashChat",
        exclude: ["README.md"]
    )
)
#endif

let package = Package(
    name: "mlx-flash",
    platforms: [.macOS(.v13)],
    products: products,
    targets: targets
)
